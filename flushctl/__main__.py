from flushctl.cli.main import main

main()
