from deepsigns_cli.cli.main import main

main()
