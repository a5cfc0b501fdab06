from mailbridge.cli import main

main()
