package vault

// NewFakeSite exposes the tests' fake site to the external conformance
// test.
func NewFakeSite(name string) Site { return newFakeAgent(name) }
