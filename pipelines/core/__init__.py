"""What every method shares: the DDIM sampling/inversion core (ddim, stream), progress events and previews, model
and LoRA loading (models, lora, peft_state, tiny_model), text and VAE helpers (text, latents), image I/O, results
and PNG metadata, caches, limits and validation, metrics and video. Nothing here imports a method."""
