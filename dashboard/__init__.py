"""Streamlit dashboard (imports streamlit/plotly lazily)."""
