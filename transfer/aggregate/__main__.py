from transfer.aggregate import main

main()
