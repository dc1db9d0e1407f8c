# One place for the project's commands. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install install-test browser java postgres run real-photos serve load lint test clean team-up team-down spark-up spark-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python  ## the runtime dependencies (pinned in requirements.txt)
	$(BIN)/pip install --quiet -r requirements.txt

install-test: install browser java postgres  ## plus what only the tests need
	$(BIN)/pip install --quiet -r requirements-test.txt

browser:  ## Debian's chromium for the real-browser test
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

java:  ## Debian's Java 17 for Spark (score -P engine=spark and its test; pyspark is in requirements-test.txt)
	@command -v java >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }

postgres:  ## Debian's PostgreSQL server, for the team layout and its tests (it runs as the postgres user)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The team layout on this machine (docs/team.md): PostgreSQL + `mlflow server`; prints what to export.
# e.g. make team-up TEAM_ARGS="--host 0.0.0.0 --artifacts s3://bucket/mlflow"
TEAM_ARGS ?=
team-up: install postgres  ## PostgreSQL (private cluster in .team/) and the tracking server on it
	$(BIN)/python -m team up $(TEAM_ARGS)

team-down:  ## stop what team-up started (the data stay in .team/)
	$(BIN)/python -m team down $(TEAM_ARGS)

# A Spark standalone cluster on this machine from PySpark's own distribution (docs/scoring.md), the one
# the tests start: pids, ports and logs in .spark/. e.g. make spark-up SPARK_ARGS="--workers 4 --cores 2"
SPARK_ARGS ?=
spark-up: install-test  ## a Spark master and two 1-core workers on loopback; prints the --spark-master to use
	$(BIN)/python -m steps.spark_cluster up $(SPARK_ARGS)

spark-down:  ## stop what spark-up started
	$(BIN)/python -m steps.spark_cluster down

run: install  ## the whole pipeline on the synthetic default
	mlflow run . --env-manager local --experiment-name animal-faces

# The model for real photos (docs/real-photos.md): ImageNet's MobileNetV2, its classifier pooled over
# cat/dog/wild, registered untrained (EPOCHS=0) or trained on SOURCE's photos. Its own catalogue.
SOURCE  ?= data/afhq.zip
WEIGHTS ?= imagenet
EPOCHS  ?= 0
real-photos: install  ## e.g. make real-photos SOURCE=/path/to/afhq.zip WEIGHTS=/path/to/mobilenet_v2.weights.h5
	mlflow run . --env-manager local --experiment-name animal-faces -P source=$(SOURCE) -P backbone=mobilenet_v2 \
	  -P weights=$(WEIGHTS) -P head=imagenet -P image_size=224 -P epochs=$(EPOCHS)

serve: install  ## the scoring server (:5001) and the upload page (http://127.0.0.1:8000) on the Production model
	$(BIN)/python -m web.serve

load: install  ## 5,000 requests from 16 threads to the page and the scoring server: req/s, latency, errors, memory
	$(BIN)/python -m bench.load

lint: install-test  ## ruff, configured in pyproject.toml: any finding or unformatted file fails
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install-test lint  ## lint, then the whole test suite
	$(BIN)/python -m pytest

clean:  ## generated data, catalogue, runs (not the venv)
	rm -rf data databases/*.db databases/*.db-* mlflow.db mlruns mlartifacts outputs

# Benchmarks: each prints measured figures as tables (docs/performance.md).
BENCHES := serving training recommender accuracy batch_scoring spark_scoring unfamiliar decoding limits slow_clients row_memory
.PHONY: bench $(addprefix bench-,$(BENCHES))
bench: $(addprefix bench-,$(BENCHES))  ## every benchmark, one after the other
$(addprefix bench-,$(BENCHES)): bench-%: install  ## one benchmark, e.g. make bench-serving
	$(BIN)/python -m bench.$*
