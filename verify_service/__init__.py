"""The verify service: the target model, one KV cache per session, one forward per round."""
