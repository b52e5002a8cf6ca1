from replq.cli import main

main()
