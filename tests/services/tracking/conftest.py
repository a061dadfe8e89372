"""One real MLflow store for every tracking test: MLflow makes a sqlite store's tables with
some thirty migrations, seconds of CPU, so they are made once per session."""

import pytest


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    from services.tracking.mlflow_runs import mlflow_client

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow_client(uri)  # makes the tables
    return uri
