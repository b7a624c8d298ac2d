"""Research code that is not the product: the analytic oracle, the toy teacher's training recipe, its tokenizer."""
