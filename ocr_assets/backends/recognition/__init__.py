"""Recognition backends: `recognize(crops) -> texts`."""
