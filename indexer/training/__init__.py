"""What is fitted on a catalog: the visual vocabulary, the autoencoder, the projection head, the fine-tuned top stages."""
