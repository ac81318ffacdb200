"""Layout backends: `detect(images) -> detections per page`."""
