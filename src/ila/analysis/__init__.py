"""`ila analyze`: what fine-tuning changed, layer by layer (seeds/004)."""
