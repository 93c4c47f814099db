"""Hub model and dataset card templates."""
