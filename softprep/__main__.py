from softprep.cli import main

main()
