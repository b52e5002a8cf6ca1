"""replq's web GUI (SPEC §12): the replication panels of the datacenter, each node and each guest,
and the JSON API they use, served by `replq web`.

    api.py     what each /api/ endpoint does, through the store as the CLI does
    app.py     the WSGI app: page, login, authentication, CSRF, routing, errors as JSON
    auth.py    the operator account, session tickets, CSRF tokens, HTTP Basic
    server.py  where the account comes from, and serving the app
    static/    the page: plain HTML, JavaScript and CSS (no build step)
"""
