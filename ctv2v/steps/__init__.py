"""The pipeline steps, one plain function each: typed paths in, a typed summary out."""
