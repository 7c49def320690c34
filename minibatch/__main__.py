from minibatch.cli import main

main()
