from torchgraft.cli import main

main()
