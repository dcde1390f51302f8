package outbox

import "encoding/json"

// Marshaler turns a staged value into the bytes of the message payload.
// Consumers decode with the matching unmarshaler; the kind in the metadata
// tells them which type to decode into.
type Marshaler interface {
	Marshal(v any) ([]byte, error)
}

// MarshalerFunc adapts a function to Marshaler.
type MarshalerFunc func(v any) ([]byte, error)

// Marshal calls f(v).
func (f MarshalerFunc) Marshal(v any) ([]byte, error) { return f(v) }

// JSONMarshaler marshals payloads with encoding/json. It is the default.
type JSONMarshaler struct{}

// Marshal returns the JSON encoding of v.
func (JSONMarshaler) Marshal(v any) ([]byte, error) { return json.Marshal(v) }
