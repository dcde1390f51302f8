// Package wireexample shows policy.ProviderSet in a Wire injector; its
// wire_gen.go is generated (make generate) and checked (make test).
package wireexample
