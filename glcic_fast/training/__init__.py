"""Training the completion network the paper's way (three phases, the context
discriminator), resumable, on one device or several (torchrun)."""
