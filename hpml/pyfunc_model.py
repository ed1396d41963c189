"""MLflow models-from-code entry: the registered pyfunc is this file, so nothing is pickled."""
import mlflow

from hpml.serving import HpmlPyfunc

mlflow.models.set_model(HpmlPyfunc())
