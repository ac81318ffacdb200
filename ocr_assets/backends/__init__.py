"""Model backends, one small interface per family: layout (`detect`) and recognition (`recognize`)."""
