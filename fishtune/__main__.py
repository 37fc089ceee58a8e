from fishtune.cli import main

main()
