from minibatch import entry

entry()
