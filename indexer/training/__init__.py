"""What is fitted on a catalog: the visual vocabulary, the autoencoder, the network adapted to the catalog (and the augmented views it learns from)."""
