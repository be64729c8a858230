"""The built-in host: OpenGait-format data, a compact GaitBase-style model, a single-process trainer
and the CASIA-B protocol, so the method runs on a fresh CPU machine (``qgait train|test|demo``)."""
