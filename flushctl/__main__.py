from flushctl.cli import main

main()
