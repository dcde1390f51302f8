package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// routes is the HTTP API:
//
//	POST /orders               {"customer": "ada", "amount_cents": 1250} → 201 {"id": "..."};
//	                           400 invalid (the body must be exactly one JSON object),
//	                           413 a body over 1 MiB or an order whose event exceeds the outbox cap
//	POST /orders/{id}/cancel   → 204, 404 unknown order, 409 already cancelled
//	GET  /orders/{id}          → 200 the order and the events the consumer received
//	GET  /healthz              → 200 or 503 with the state of each part
//	GET  /metrics              → the OpenTelemetry metrics, Prometheus text format
//
// The tenant comes from the X-Tenant and X-Tenant-Tier headers and is stamped
// on the staged events, where the routing policy matches the tier.
func (a *App) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", a.createOrder)
	mux.HandleFunc("POST /orders/{id}/cancel", a.cancelOrder)
	mux.HandleFunc("GET /orders/{id}", a.getOrder)
	mux.HandleFunc("GET /healthz", a.health)
	mux.Handle("GET /metrics", a.metrics.handler())
	return a.logRequests(mux)
}

func tenantContext(r *http.Request) context.Context {
	return outbox.WithTenant(r.Context(), r.Header.Get("X-Tenant"), r.Header.Get("X-Tenant-Tier"))
}

// maxBodyBytes bounds a request body; a larger one is answered 413.
const maxBodyBytes = 1 << 20

func (a *App) createOrder(w http.ResponseWriter, r *http.Request) {
	var c CreateOrder
	if !decodeBody(w, r, &c) {
		return
	}
	id, err := mediator.Send(tenantContext(r), a.m, c)
	if err != nil {
		a.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, map[string]OrderID{"id": id})
}

func (a *App) cancelOrder(w http.ResponseWriter, r *http.Request) {
	if _, err := mediator.Send(tenantContext(r), a.m, CancelOrder{ID: OrderID(r.PathValue("id"))}); err != nil {
		a.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *App) getOrder(w http.ResponseWriter, r *http.Request) {
	o, err := mediator.Send(r.Context(), a.m, GetOrder{ID: OrderID(r.PathValue("id"))})
	if err != nil {
		a.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, o)
}

// decodeBody decodes the body of r, which must hold exactly one JSON object
// with no unknown fields and at most maxBodyBytes, into v. On failure it
// answers 413 (too large) or 400 and returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		// Anything after the object but white space — a second object,
		// stray bytes — makes the body invalid, not silently ignored.
		if _, next := dec.Token(); next != io.EOF {
			err = errors.New("the body must hold exactly one JSON object")
			if next != nil {
				err = next
			}
		}
	}
	if err == nil {
		return true
	}
	if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
		writeJSON(w, http.StatusRequestEntityTooLarge, errorBody{Error: fmt.Sprintf("request body larger than %d bytes", mbe.Limit)})
		return false
	}
	writeJSON(w, http.StatusBadRequest, errorBody{Error: "invalid JSON: " + err.Error()})
	return false
}

// Health is the body of /healthz.
type Health struct {
	Status string            `json:"status"` // "ok" or "unavailable"
	Roles  []string          `json:"roles"`
	Checks map[string]string `json:"checks"`
	// PolicyVersion is the routing policy in use.
	PolicyVersion string `json:"policy_version"`
	// Outbox is the outbox's health report (outbox.Health): the backlog,
	// the dead letters, and in a relay process the relays and the
	// "publisher" component, which turns degraded at the first publish
	// that fails because the broker is unreachable and unhealthy after
	// 10 s of such an outage with messages waiting.
	Outbox outbox.HealthReport `json:"outbox"`
}

// health reports the database, the routing policy and the outbox: 503 when
// the database does not answer within 2 s, when the last change to the
// policy files was rejected (the last good policy is still in use, but
// someone should look), or when the outbox's health check is unhealthy
// (for instance the relay's broker unreachable for 10 s with messages
// waiting). A degraded outbox component is listed in Checks, with 200.
func (a *App) health(w http.ResponseWriter, r *http.Request) {
	h := Health{Status: "ok", Roles: a.cfg.Roles, Checks: map[string]string{}}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	h.Checks["database"] = "ok"
	if err := a.db.PingContext(ctx); err != nil {
		h.Status, h.Checks["database"] = "unavailable", err.Error()
	}
	st := a.watcher.Status()
	h.PolicyVersion = st.Version
	h.Checks["policy"] = "ok"
	if err := a.watcher.Healthy(); err != nil {
		h.Status, h.Checks["policy"] = "unavailable", err.Error()
	}
	h.Outbox = a.outboxH.Check(ctx)
	for _, c := range h.Outbox.Components {
		if c.Status != outbox.HealthOK {
			h.Checks["outbox."+c.Name] = string(c.Status) + ": " + c.Message
		}
	}
	if h.Outbox.Status == outbox.HealthUnhealthy {
		h.Status = "unavailable"
	}
	code := http.StatusOK
	if h.Status != "ok" {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, h)
}

type errorBody struct {
	Error  string       `json:"error"`
	Fields []fieldError `json:"fields,omitempty"`
}

type fieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// errorLogLevel is the level at which the Logging behavior logs a failed
// dispatch (LoggingConfig.ErrorLevelFor): the outcomes writeError answers
// with a 4xx are expected — the client's mistake or a conflict it handles —
// and logged at INFO; anything else is a server error, at ERROR.
func errorLogLevel(err error) slog.Level {
	var ve *behaviors.ValidationError
	switch {
	case errors.As(err, &ve), errors.Is(err, ErrNotFound), errors.Is(err, ErrNotCancellable):
		return slog.LevelInfo
	case errors.Is(err, outbox.ErrPayloadTooLarge):
		return slog.LevelWarn
	}
	return slog.LevelError
}

// writeError maps the handlers' errors to HTTP statuses; anything unexpected
// is logged and reported as 500 without details.
func (a *App) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ve *behaviors.ValidationError
	switch {
	case errors.As(err, &ve):
		body := errorBody{Error: "invalid request"}
		for _, f := range ve.Fields {
			body.Fields = append(body.Fields, fieldError{Field: f.Field, Message: f.Message})
		}
		writeJSON(w, http.StatusBadRequest, body)
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, errorBody{Error: ErrNotFound.Error()})
	case errors.Is(err, ErrNotCancellable):
		writeJSON(w, http.StatusConflict, errorBody{Error: ErrNotCancellable.Error()})
	case errors.Is(err, outbox.ErrPayloadTooLarge):
		// The event the order would stage exceeds the outbox's cap
		// (outbox.Config.MaxPayloadBytes): nothing was written.
		writeJSON(w, http.StatusRequestEntityTooLarge, errorBody{Error: "order too large: its event would exceed the outbox payload limit"})
	default:
		a.logger.ErrorContext(r.Context(), "orders-service: request failed", "method", r.Method, "path", r.URL.Path, "error", err)
		writeJSON(w, http.StatusInternalServerError, errorBody{Error: "internal error"})
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// logRequests logs one line per request.
func (a *App) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		a.logger.LogAttrs(r.Context(), slog.LevelInfo, "http request",
			slog.String("method", r.Method), slog.String("path", r.URL.Path),
			slog.Int("status", rec.status), slog.Duration("duration", time.Since(start)))
	})
}
