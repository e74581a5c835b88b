#!/usr/bin/env python3
"""module-graph.py SRC [-g]: the import graph between the files of one crate (crate:: and super::
paths, and a mod.rs using its own children), tests and binaries left out; prints it with -g,
then its cycles; exits 1 when there is one."""
import os,re,sys
src=sys.argv[1]
mods={}
for root,_,files in os.walk(src):
    for f in files:
        if not f.endswith('.rs') or '/bin' in root or f=='main.rs': continue
        p=os.path.join(root,f); rel=os.path.relpath(p,src)[:-3].split(os.sep)
        if rel[-1] in ('mod','lib'): rel=rel[:-1]
        mods[tuple(rel)]=p
def resolve(path):
    path=tuple(path)
    while path and path not in mods: path=path[:-1]
    return path or None
edges={m:set() for m in mods}
for m,p in mods.items():
    t=open(p).read()
    t=re.sub(r'#\[cfg\(test\)\]\s*(pub\(crate\) )?mod \w+\s*\{.*','',t,flags=re.S)
    for mm in re.finditer(r'\b(crate|super)::((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)',t):
        base=() if mm.group(1)=='crate' else (m[:-1] if not p.endswith('mod.rs') else m[:-1])
        parts=list(base)+mm.group(2).split('::')
        r=resolve(parts)
        if r and r!=m: edges[m].add(r)
    for mm in re.finditer(r'\b(crate|super)::((?:[a-z_][a-z0-9_]*::)+)\{([^}]*)\}',t):
        base=() if mm.group(1)=='crate' else m[:-1]
        for item in mm.group(3).split(','):
            item=item.strip().split(' ')[0]
            parts=list(base)+mm.group(2).rstrip(':').split('::')+[x for x in item.split('::') if x and x!='self']
            r=resolve(parts)
            if r and r!=m: edges[m].add(r)
    # child modules used as `name::` inside a mod.rs / lib.rs
    if p.endswith('mod.rs') or p.endswith('lib.rs'):
        for mm in re.finditer(r'^(?:pub )?use ([a-z_]+)::',t,flags=re.M):
            r=resolve(list(m)+[mm.group(1)])
            if r and r!=m: edges[m].add(r)
if '-g' in sys.argv:
    for m in sorted(edges):
        print('::'.join(m) or 'lib', '->', ', '.join(sorted('::'.join(x) for x in edges[m])))
# cycles
idx={};low={};st=[];on=set();n=[0];comps=[]
def sc(v):
    idx[v]=low[v]=n[0];n[0]+=1;st.append(v);on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        c=[]
        while True:
            w=st.pop();on.discard(w);c.append(w)
            if w==v:break
        if len(c)>1:comps.append(c)
for v in edges:
    if v not in idx: sc(v)
for c in comps: print('cycle:',[ '::'.join(x) for x in c])
print(len(comps), "cycles")
sys.exit(1 if comps else 0)
