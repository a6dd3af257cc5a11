"""Reading images, plates and tables; writing profiles."""
