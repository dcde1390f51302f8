# tailrace — development commands. `make test` is the README's test command and
# what CI runs (with TAILRACE_REQUIRE_SERVICES=1, see .ci/run).

GO      ?= go
PKGS    ?= ./...
TIMEOUT ?= 30m

.PHONY: test vet unit lint bench bench-relay bench-consume bench-worker chaos fmt generate check-generated

## test: vet, check generated code, then every test with the race detector.
## Ends with a line saying how many service tests were skipped because a
## service was unreachable (loud when any were: go test shows the reason only
## with -v); the exit status is go test's.
test: vet check-generated
	@skips=$$(mktemp); \
	echo "$(GO) test -race -timeout $(TIMEOUT) $(PKGS)"; \
	TAILRACE_SKIP_LOG=$$skips $(GO) test -race -timeout $(TIMEOUT) $(PKGS); rc=$$?; \
	if [ -s $$skips ]; then \
		echo; \
		echo "!!! SKIPPED $$(wc -l <$$skips | tr -d ' ') service test(s): a service was unreachable. By service:"; \
		cut -f1,2 $$skips | sort | uniq -c | sed 's/^ */!!!   /; s/\t/ at /'; \
		echo "!!! Those tests did NOT run. Start the services (docs/testing.md), or set TAILRACE_REQUIRE_SERVICES=1 to fail instead."; \
	else \
		echo "service tests: none skipped"; \
	fi; \
	rm -f $$skips; exit $$rc

## unit: the tests without the race detector (faster while iterating).
unit:
	$(GO) test -timeout $(TIMEOUT) $(PKGS)

vet:
	$(GO) vet $(PKGS)

## lint: staticcheck, pinned as a tool in go.mod.
lint: vet
	$(GO) tool staticcheck $(PKGS)

## bench: the micro-benchmarks, with allocations.
bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

## bench-relay: tailrace vs Watermill's stock forwarder, PostgreSQL → RabbitMQ
## (needs the local services; see docs/benchmarks.md). BENCH_FLAGS adds flags,
## e.g. BENCH_FLAGS='-backlogs 2000,20000,200000'.
BENCH_FLAGS ?=
bench-relay:
	mkdir -p bench-results
	$(GO) run ./cmd/tailrace-bench -json bench-results/relay.json $(BENCH_FLAGS)

## bench-consume: end to end, staged events → relay → RabbitMQ → bus.Consumer
## (Transaction ▸ Inbox, one insert per event), 3 rounds next to a one-at-a-time
## consumer (needs the local services; see docs/benchmarks.md).
bench-consume:
	mkdir -p bench-results
	$(GO) run ./cmd/tailrace-bench -sections consume -json bench-results/consume.json $(BENCH_FLAGS)

## bench-worker: outbox.Worker vs River, PostgreSQL only (needs the local
## PostgreSQL; see docs/benchmarks.md). River lives in the separate module
## bench/river, never in the library's import graph. BENCH_FLAGS adds flags.
bench-worker:
	mkdir -p bench-results
	cd bench/river && $(GO) run . $(BENCH_FLAGS) | tee ../../bench-results/worker.txt

## chaos: the fault-injection suite at full scale (docs/reliability.md), one
## package at a time, output in bench-results/chaos.log and its ledger lines
## printed. It STOPS the local RabbitMQ for 30 s and RESTARTS the local
## PostgreSQL (pg_ctlcluster): run it alone. CHAOS_RESTARTS=0 keeps the shared
## services up (the other scenarios still run at full scale). Like `make test`
## (which runs the same scenarios at a small scale) it uses the race detector:
## the relay processes publish through tailrace's own bus/* publishers, and
## no scenario runs watermill-amqp's reconnect code any more.
CHAOS_RESTARTS ?= 1
CHAOS_FUZZTIME ?= 30s
CHAOS_RUN = TestRelayKill9|TestRelayBrokerCut|TestRelayGracefulCloseProcess|TestRelayThreeRelays|TestRelayTakeover|TestRelayDatabaseCut|TestRelayBrokerOutage|TestRelayPoisonDeadLettered|TestRelayOutOfOrderCommit|TestRelayHotKeyDoesNotStarveOthers|TestChaos
chaos:
	mkdir -p bench-results
	TAILRACE_RELAY_FULL=1 TAILRACE_CHAOS=$(CHAOS_RESTARTS) $(GO) test -race -p 1 -count=1 -timeout 60m -v \
		-run '$(CHAOS_RUN)' ./outbox/ ./bus/ ./policy/ >bench-results/chaos.log 2>&1; rc=$$?; \
	grep -E 'CHAOS LEDGER|FINDING|ledger|kill -9 in|broker (down|cut)|drained|warnings during|^(--- |ok|FAIL)' bench-results/chaos.log; \
	[ $$rc -eq 0 ] && $(GO) test -run '^$$' -fuzz '^FuzzLoad$$' -fuzztime $(CHAOS_FUZZTIME) ./policy/

fmt:
	gofmt -w $$(git ls-files '*.go')

## generate: regenerate Wire code (wire_gen.go files).
generate:
	$(GO) generate $(PKGS)

## check-generated: fail when a checked-in wire_gen.go is out of date.
check-generated:
	@dirs=$$(git ls-files '*wire_gen.go' | xargs -r -n1 dirname | sort -u); \
	for d in $$dirs; do \
		$(GO) tool wire diff ./$$d >/dev/null 2>&1 || { echo "wire_gen.go in $$d is out of date: run make generate"; $(GO) tool wire diff ./$$d; exit 1; }; \
	done
