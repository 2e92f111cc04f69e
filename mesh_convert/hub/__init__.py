"""The Hugging Face Hub: uploading a model directory (`push`)."""
