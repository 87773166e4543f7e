'use strict'
// nsqjs's Writer and Reader with an `authSecret` against the real knsq-broker started with
// `--auth-http-address` pointing at an auth server run by the test (see harness.js): the
// secret reaches the auth server, allowed publishes and subscriptions work, and a denied
// publish surfaces the broker's error to the client.

const assert = require('node:assert/strict')
const {AuthServer, authTest, Deliveries} = require('./harness')

const TOPIC = 'auth_topic'
const grantBoth = AuthServer.grant('^auth_', ['.*'], ['publish', 'subscribe'])

authTest('an authorized Writer and Reader publish and consume', {answer: grantBoth}, async ({broker, clients, authServer}) => {
  const deliveries = new Deliveries()
  clients.collectingReader(TOPIC, 'ch', deliveries, {authSecret: 'reader-secret'})
  await broker.waitForConsumers(TOPIC, 'ch', 1)
  const writer = await clients.writer({authSecret: 'writer-secret'})

  await clients.publish(writer, TOPIC, 'hello with auth')
  await clients.publish(writer, TOPIC, ['two', 'three']) // MPUB

  await deliveries.waitCount(3)
  assert.deepEqual(deliveries.bodies().sort(), ['hello with auth', 'three', 'two'])

  const secrets = authServer.requests.map((r) => r.fields.secret).sort()
  assert.deepEqual(secrets, ['reader-secret', 'writer-secret'])
  for (const r of authServer.requests) {
    assert.equal(r.method, 'GET')
    assert.equal(r.path, '/auth')
    assert.equal(r.fields.remote_ip, '127.0.0.1')
    assert.equal(r.fields.tls, 'false')
  }

  // /stats shows who the consumer and the producer are.
  const chan = await broker.channelStats(TOPIC, 'ch')
  assert.equal(chan.clients[0].authed, true)
  assert.equal(chan.clients[0].auth_identity, 'nsqjs-user')
  assert.equal(chan.clients[0].auth_identity_url, 'http://id.example/nsqjs-user')
  const {producers} = await broker.stats()
  assert.equal(producers.length, 1)
  assert.equal(producers[0].authed, true)
  clients.assertNoErrors()
})

authTest('a denied publish surfaces E_UNAUTHORIZED', {answer: AuthServer.grant('^auth_', ['.*'], ['publish'])}, async ({broker, clients}) => {
  const writer = await clients.writer({authSecret: 'writer-secret'})
  await clients.publish(writer, TOPIC, 'allowed')
  await assert.rejects(
    clients.publish(writer, 'forbidden_topic', 'denied'),
    (err) => {
      assert.match(String(err), /E_UNAUTHORIZED AUTH failed for PUB on "forbidden_topic" ""/)
      return true
    }
  )
  assert.equal(await broker.topicStats('forbidden_topic'), null)
  assert.equal((await broker.topicStats(TOPIC)).message_count, 1)
})

authTest('the POST method works with nsqjs', {answer: grantBoth, brokerArgs: ['--auth-http-request-method=post']}, async ({clients, authServer}) => {
  const writer = await clients.writer({authSecret: 'posted secret'})
  await clients.publish(writer, TOPIC, 'posted')
  assert.equal(authServer.requests.length, 1)
  assert.equal(authServer.requests[0].method, 'POST')
  assert.equal(authServer.requests[0].fields.secret, 'posted secret')
  clients.assertNoErrors()
})

authTest('a Writer without a secret is refused', {answer: grantBoth}, async ({clients}) => {
  const writer = await clients.writer()
  await assert.rejects(clients.publish(writer, TOPIC, 'no secret'), /E_AUTH_FIRST AUTH required before PUB/)
})
