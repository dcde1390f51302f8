package mediator_test

import (
	"context"
	"errors"
	"fmt"
	"iter"

	"github.com/tailrace/tailrace/mediator"
)

type OrderID string

type PlaceOrder struct {
	mediator.Command[OrderID]
	Customer string
}

func (PlaceOrder) Kind() string { return "orders.place" }

type GetOrder struct {
	mediator.Query[string]
	ID OrderID
}

func (GetOrder) Kind() string { return "orders.get" }

// trace returns a behavior that prints when it is entered and left.
func trace(name string) mediator.Behavior {
	return mediator.BehaviorFunc(func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
		fmt.Printf("%s before %s %s\n", name, info.Type, info.Kind)
		res, err := next(ctx, req)
		fmt.Printf("%s after\n", name)
		return res, err
	})
}

// Behaviors run as an onion: the lower the Order, the further out. Equal
// orders keep the order in which they were added; the order of the Use calls
// does not matter otherwise.
func Example_order() {
	m := mediator.New()
	mediator.RegisterFunc(m, func(ctx context.Context, c PlaceOrder) (OrderID, error) {
		fmt.Println("handler")
		return OrderID("order-1-" + c.Customer), nil
	})
	m.Use(mediator.Layer{Order: 20, Behavior: trace("inner")})
	m.Use(mediator.Layer{Order: 10, Behavior: trace("outer")})

	id, err := mediator.Send(context.Background(), m, PlaceOrder{Customer: "ada"})
	fmt.Println(id, err)
	// Output:
	// outer before command orders.place
	// inner before command orders.place
	// handler
	// inner after
	// outer after
	// order-1-ada <nil>
}

// A Scope limits a behavior to some request types: here the "tx" behavior
// wraps commands only, as the Transaction behavior does.
func ExampleCommands() {
	m := mediator.New()
	mediator.RegisterFunc(m, func(ctx context.Context, c PlaceOrder) (OrderID, error) { return "order-1", nil })
	mediator.RegisterFunc(m, func(ctx context.Context, q GetOrder) (string, error) { return "order " + string(q.ID), nil })
	m.Use(mediator.Layer{Order: 10, Behavior: trace("tx"), Scope: mediator.Commands()})

	ctx := context.Background()
	id, _ := mediator.Send(ctx, m, PlaceOrder{Customer: "ada"})
	s, _ := mediator.Send(ctx, m, GetOrder{ID: id})
	fmt.Println(s)
	// Output:
	// tx before command orders.place
	// tx after
	// order order-1
}

// A behavior that does not call next short-circuits the dispatch.
func ExampleBehaviorFunc_shortCircuit() {
	m := mediator.New()
	mediator.RegisterFunc(m, func(ctx context.Context, c PlaceOrder) (OrderID, error) {
		fmt.Println("never printed")
		return "", nil
	})
	m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
		if c, ok := req.(PlaceOrder); ok && c.Customer == "" {
			return nil, errors.New("customer required")
		}
		return next(ctx, req)
	})})

	_, err := mediator.Send(context.Background(), m, PlaceOrder{})
	fmt.Println(err)
	// Output:
	// customer required
}

type OrderPlaced struct {
	mediator.Notification
	ID OrderID
}

func (OrderPlaced) Kind() string { return "orders.placed" }

// Notifications go to every handler, in registration order by default.
// Behaviors wrap the whole fan-out once.
func ExamplePublish() {
	m := mediator.New(mediator.WithPublishStrategy(mediator.JoinAllErrors()))
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, e OrderPlaced) error {
		fmt.Println("email for", e.ID)
		return nil
	})
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, e OrderPlaced) error {
		return errors.New("search index down")
	})
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, e OrderPlaced) error {
		fmt.Println("stock for", e.ID)
		return nil
	})

	err := mediator.Publish(context.Background(), m, OrderPlaced{ID: "order-1"})
	fmt.Println("error:", err)
	// Output:
	// email for order-1
	// stock for order-1
	// error: search index down
}

type ListOrders struct {
	mediator.Stream[OrderID]
	Customer string
}

func (ListOrders) Kind() string { return "orders.list" }

// A stream request returns a sequence; behaviors wrap its whole iteration.
func ExampleSendStream() {
	m := mediator.New()
	mediator.RegisterStreamFunc(m, func(ctx context.Context, q ListOrders) iter.Seq2[OrderID, error] {
		return func(yield func(OrderID, error) bool) {
			for _, id := range []OrderID{"order-1", "order-2"} {
				if !yield(id, nil) {
					return
				}
			}
		}
	})
	m.Use(mediator.Layer{Behavior: trace("log")})

	for id, err := range mediator.SendStream(context.Background(), m, ListOrders{Customer: "ada"}) {
		if err != nil {
			fmt.Println("error:", err)
			break
		}
		fmt.Println(id)
	}
	// Output:
	// log before stream orders.list
	// order-1
	// order-2
	// log after
}

// KindOf names a value without dispatching: the outbox stamps this name on
// staged messages. Types without a Kind method can be named on a mediator.
func ExampleMediator_KindOf() {
	type PaymentFailed struct{ Order OrderID } // no Kind method, no handler here
	m := mediator.New()
	mediator.RegisterKind[PaymentFailed](m, "payments.failed")

	k1, _ := mediator.KindOf(OrderPlaced{})
	k2, _ := m.KindOf(PaymentFailed{})
	_, err := mediator.KindOf(PaymentFailed{})
	fmt.Println(k1)
	fmt.Println(k2)
	fmt.Println(err)
	// Output:
	// orders.placed
	// payments.failed
	// mediator: no kind for mediator_test.PaymentFailed: add a Kind() string method or register a name
}
