"""The explicit curriculum: which training examples are available at each step, in what order."""
