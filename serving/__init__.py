"""The HTTP scoring service behind serve.py (FastAPI, uvicorn, python-multipart and
prometheus-client: requirements-serve.txt). Nothing else in the project imports it, so
training and scoring from the command line do not need those packages."""
from serving.app import create_app
from serving.service import ServeConfig

__all__ = ["ServeConfig", "create_app"]
