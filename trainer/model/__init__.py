"""The model side: loading a model and tokenizer, the training loss, the training
method (which parameters train), and the packing probe."""
