"""Views: plotly figures and ipywidgets on top of generations and traces."""
