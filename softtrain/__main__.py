from softtrain.cli import main

main()
