package mediator

import (
	"context"
	"errors"
	"slices"
)

// Next runs the rest of the pipeline: the next behavior inward, or the
// handler. It takes the request so that the chain can be built once per
// request type (no closure is allocated per call) and so that a behavior may
// pass on a replacement of the same Go type; passing a value of another type
// makes the dispatch fail with ErrRequestType.
//
// Next may be called zero times (short-circuit: the behavior's own return
// values become the result), once, or several times (Retry); it may be
// called from another goroutine and after Handle returned, since it holds no
// per-call state.
type Next func(ctx context.Context, req any) (any, error)

// Behavior wraps every dispatch it is registered for: Send, Publish and
// SendStream. It sees the request as any plus its Info, calls next to go on,
// and returns the response (nil for notifications and streams) and error.
//
// For Publish, the behavior wraps the whole fan-out to all handlers once. For
// SendStream, next returns after the whole sequence has been consumed (or the
// consumer stopped), so a behavior wraps the stream's entire life.
//
// A behavior that returns (nil, nil) without calling next short-circuits the
// dispatch: Send then returns the zero response and a nil error. A response
// of the wrong type makes Send fail with ErrResponseType.
type Behavior interface {
	Handle(ctx context.Context, req any, info Info, next Next) (any, error)
}

// BehaviorFunc adapts a function to Behavior.
type BehaviorFunc func(ctx context.Context, req any, info Info, next Next) (any, error)

// Handle calls f(ctx, req, info, next).
func (f BehaviorFunc) Handle(ctx context.Context, req any, info Info, next Next) (any, error) {
	return f(ctx, req, info, next)
}

// Layer is a behavior with its place in the pipeline.
//
// Order: the lower the Order, the further out the behavior sits: it runs
// first on the way in and last on the way out. Layers with equal Order keep
// the order in which they were added (the earlier one is outside). The
// pipeline therefore never depends on the order in which a DI container
// happens to collect behaviors, only on Order.
//
//	outer (Order 10) before → inner (Order 20) before → handler
//	                         → inner after → outer after
type Layer struct {
	// Order places the behavior; lower is outer. Any int is valid.
	Order int
	// Behavior is required.
	Behavior Behavior
	// Scope limits the request types the behavior wraps; nil wraps all.
	Scope Scope
	// Check, when set, vets every pipeline the layer is part of when the
	// pipeline is built: once per registered type the layer wraps, at its
	// registration and again whenever layers are added, with the type's
	// Info and the layers wrapping it in pipeline order (outermost first,
	// this layer included). An error refuses that registration or Use, so
	// that behaviors which cannot work together (Inbox without a
	// Transaction outside it) fail at start-up instead of at every
	// dispatch. Add layers that depend on each other in one Use (or
	// WithLayers, or Build). Optional.
	Check func(info Info, pipeline []Layer) error
}

// Scope decides, once per request type when the pipeline is built, whether a
// layer wraps that type. sample is a non-nil value of the request type (for
// a pointer type, a pointer to a zero value; nil only for interface types),
// for checks such as "implements a marker interface". A scope must not
// depend on anything that changes at run time; a behavior that needs to
// decide per value checks the request itself in Handle.
type Scope func(info Info, sample any) bool

// Commands limits a layer to commands (Send of a type embedding Command).
func Commands() Scope { return OfType(TypeCommand) }

// OfType limits a layer to the given request types.
func OfType(types ...RequestType) Scope {
	types = slices.Clone(types)
	return func(info Info, _ any) bool { return slices.Contains(types, info.Type) }
}

// Implementing limits a layer to request types that implement I, typically a
// marker interface such as interface{ Transactional() }.
func Implementing[I any]() Scope {
	return func(_ Info, sample any) bool {
		_, ok := sample.(I)
		return ok
	}
}

// Kinds limits a layer to the request types with the given kinds.
func Kinds(kinds ...string) Scope {
	kinds = slices.Clone(kinds)
	return func(info Info, _ any) bool { return slices.Contains(kinds, info.Kind) }
}

// Where limits a layer to the request types for which pred returns true.
func Where(pred func(info Info) bool) Scope {
	return func(info Info, _ any) bool { return pred(info) }
}

// All combines scopes: the layer wraps a type only if every scope accepts it.
func All(scopes ...Scope) Scope {
	scopes = slices.Clone(scopes)
	return func(info Info, sample any) bool {
		for _, s := range scopes {
			if s != nil && !s(info, sample) {
				return false
			}
		}
		return true
	}
}

func (l Layer) validate() error {
	if l.Behavior == nil {
		return errors.New("mediator: layer has a nil Behavior")
	}
	return nil
}

// chain wraps inner with the layers, the first layer outermost. It is called
// once per request type (and per call only for streams and PublishWith).
func chain(layers []Layer, info Info, inner Next) Next {
	next := inner
	for i := len(layers) - 1; i >= 0; i-- {
		n := next
		if f, ok := layers[i].Behavior.(BehaviorFunc); ok {
			next = func(ctx context.Context, req any) (any, error) { return f(ctx, req, info, n) }
			continue
		}
		b := layers[i].Behavior
		next = func(ctx context.Context, req any) (any, error) { return b.Handle(ctx, req, info, n) }
	}
	return next
}

// applicable returns, in pipeline order, the layers that wrap a type.
func applicable(sorted []Layer, info Info, sample any) []Layer {
	var out []Layer
	for _, l := range sorted {
		if l.Scope == nil || l.Scope(info, sample) {
			out = append(out, l)
		}
	}
	return out
}
