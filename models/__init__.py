"""Pure torch models (they know nothing about files) and the small routines that train them."""
