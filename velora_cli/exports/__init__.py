"""One module per export format of a tuned configuration (the velora format itself is
`velora_cli.configs`)."""
