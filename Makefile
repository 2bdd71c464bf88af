GO ?= go
PKGS := ./...

.PHONY: run test bench fuzz lint build check-redis check-deploy

STATICCHECK_VERSION ?= v0.8.2
KUSTOMIZE_VERSION ?= v5.7.1
GOBIN_DIR = $(shell $(GO) env GOPATH)/bin

## run: the proxy with the embedded IM emulator and the in-process cache (no account, no Redis needed)
run:
	$(GO) run ./cmd/proxy -demo -listen 127.0.0.1:8080 -admin-listen 127.0.0.1:9090

## test: the whole suite under the race detector, against real redis-server processes it starts itself
test: check-redis
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 20m $(PKGS)

check-redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "make test needs redis-server (the tests start their own on free loopback ports)."; \
	  echo "Install it: sudo apt-get install -y redis-server redis-tools   (macOS: brew install redis)"; \
	  exit 1; }

## lint: go vet and staticcheck (installed from the Go module proxy when missing)
lint:
	$(GO) vet $(PKGS)
	@command -v staticcheck >/dev/null 2>&1 || test -x "$(GOBIN_DIR)/staticcheck" || \
	  $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	"$$(command -v staticcheck || echo $(GOBIN_DIR)/staticcheck)" $(PKGS)

## check-deploy: promtool checks of the alert rules and their unit tests (needs promtool: apt-get install
## prometheus), and the kustomize rendering decoded strictly (kustomize installed from the Go module proxy)
check-deploy:
	promtool check rules deploy/prometheus/alerts.yml
	promtool check config deploy/prometheus/prometheus.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml
	@command -v kustomize >/dev/null 2>&1 || test -x "$(GOBIN_DIR)/kustomize" || \
	  $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	"$$(command -v kustomize || echo $(GOBIN_DIR)/kustomize)" build deploy/kubernetes > $(CURDIR)/.rendered.yaml
	KUSTOMIZE_OUTPUT=$(CURDIR)/.rendered.yaml $(GO) test -count=1 -run TestRenderedManifests ./deploy/
	rm -f $(CURDIR)/.rendered.yaml

BENCHSTAT_VERSION ?= v0.0.0-20260908200009-22c9c6c9d4da

## BENCH_BASE: the git revision whose proxy make bench builds into bin/prev/ and measures beside this one (the
## previous build); by default the commit that last regenerated docs/benchmarks.md. Empty: none.
BENCH_BASE ?= $(shell git log -1 --format=%H -- docs/benchmarks.md 2>/dev/null)

## bench: the benchmark suite (about 10 minutes): Go micro-benchmarks compared with the previous run by
## benchstat, then bin/loadgen's scenarios (this build, the previous build and the bare handler; CPU profiles
## in bin/profiles/); regenerates docs/benchmarks.md and its plots in docs/bench/
bench: check-redis
	CGO_ENABLED=0 $(GO) build -o bin/ ./cmd/...
	rm -rf bin/prev bin/profiles
	$(GO) test -run '^$$' -bench . -benchmem -count 6 -benchtime 500ms ./usersig/ ./im/ ./batcher/ ./cache/ ./proxy/ | tee bin/micro.txt
	rm -f bin/benchstat.txt
	if [ -f docs/bench/micro.txt ]; then \
	  $(GO) run golang.org/x/perf/cmd/benchstat@$(BENCHSTAT_VERSION) docs/bench/micro.txt bin/micro.txt > bin/benchstat.txt || rm -f bin/benchstat.txt; fi
	bin/loadgen -bin bin -base '$(BENCH_BASE)' -base-bin bin/prev -go '$(GO)' -scenario all -report docs/benchmarks.md -plots docs/bench \
	  -micro bin/micro.txt -benchstat bin/benchstat.txt
	mkdir -p docs/bench && cp bin/micro.txt docs/bench/micro.txt

## fuzz: bounded fuzzing of request decoding and UserSig verification
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzVerify -fuzztime 20s ./usersig/
	$(GO) test -run '^$$' -fuzz FuzzPortraitGet -fuzztime 20s ./httpapi/

build:
	CGO_ENABLED=0 $(GO) build -o bin/ ./cmd/...
