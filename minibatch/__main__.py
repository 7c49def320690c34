from minibatch.cli import entry

entry()
