"""Front end: turns text into engine requests and engine outputs back into text. Owns the
tokenizer, detokenization and stop strings (the HTTP server builds on it)."""
