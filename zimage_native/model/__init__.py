"""Plain PyTorch definitions of the Z-Image models. No device, dtype or backend decisions here."""
