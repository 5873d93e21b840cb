from velora_cli.cli import main

main()
