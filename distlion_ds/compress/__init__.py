"""compress layer of distlion_ds (see DESIGN section 2)."""
