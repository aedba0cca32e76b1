"""slimlm engine: load, compress and measure causal language models. Never imports streamlit."""
